"""The REST job service (`nebula serve`): FastAPI app, auth, schemas, settings."""
