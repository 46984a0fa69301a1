"""The HTTP service behind ``birder-serve``: a FastAPI app, its dynamic batcher and its web page.

Needs the ``serve`` extra (``pip install 'birder[serve]'``); ``import birder`` never imports this package.
"""
