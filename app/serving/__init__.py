"""Serving inside a web worker: the loaded model, hot reloads and batched inference."""
