"""``molmoe-lite serve``: an OpenAI-compatible HTTP server and a web page, on the engine.

Modules: ``schema`` (request validation), ``prompt`` (a conversation -> the processor's
text and images), ``image_urls`` (data URLs and allowed local files -> images),
``errors`` (OpenAI's error shape), ``responses`` (completion and chunk JSON, points),
``bridge`` (engine handles -> asyncio), ``app`` (routes, limits, API key), ``page`` (the web
page in ``static/``), ``server`` (the runner). ``stop`` strings are cut by the engine.
Needs the ``serve`` extra (starlette, uvicorn); nothing else imports this package.
"""
