"""OpenAI-compatible HTTP server: FastAPI routes over an engine loop in its own process (or a thread).

Entry points: ``joule.server.cli.add_serve_arguments`` / ``run_serve`` (``joule serve``) and
``joule.server.app.build_app`` for embedding the app with an engine of your own.
"""
