"""The browser app (Gradio): `create_app(settings)` builds it, `serve(settings)` runs it."""
