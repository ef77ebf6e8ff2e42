"""``busd web``: the operator dashboard (the ``busd[web]`` extra: Starlette + uvicorn).

Modules: :mod:`~busd.web.security` (the token, Host/Origin checks, CSRF),
:mod:`~busd.web.views` (the data, through the readers the CLI uses),
:mod:`~busd.web.site` (the Starlette app, Server-Sent Events, uvicorn). The page
itself is static (``static/``): no CDN, no build step.
"""
