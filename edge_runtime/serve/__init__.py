"""The on-device daemon: OpenAI-compatible HTTP over one loaded model (FastAPI + uvicorn)."""
