"""`moe-local serve`: an OpenAI-compatible HTTP server over one loaded model (a layer above runtime/).

protocol.py (request validation, response shapes, error objects) and engine.py (the worker and its
FIFO) need only the standard library; app.py (Starlette) and server.py (uvicorn) need the `serve`
extra, so importing this package never requires it.
"""
