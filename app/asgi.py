"""The application object for ASGI servers started by module path (pyvoy, uvicorn)."""

from app.main import create_app

app = create_app()
