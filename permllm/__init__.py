"""permllm."""
