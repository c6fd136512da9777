"""The web trading terminal: static files (``static/``) and the routes that serve them."""
