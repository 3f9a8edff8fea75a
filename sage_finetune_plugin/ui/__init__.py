"""``sage finetune ui``: a local web page and a REST API (``/api/v1``) over the services.

``app.py`` builds the FastAPI application (routes that call the same services the commands
call; errors as the services' one-line messages with an HTTP status), ``jobs.py`` runs the long
operations (run, eval, merge, export) as ``sage-finetune`` worker processes, one per task at a
time, and stops them cleanly with the server, ``server.py`` checks the address and the token
rule and runs Uvicorn. ``static/`` holds the one page (HTML, JavaScript, CSS: no build step,
nothing fetched from elsewhere). FastAPI and Uvicorn (the ``ui`` extra) are imported by
``app.py`` and ``server.py`` only, which the command imports when it runs.
"""
