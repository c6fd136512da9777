"""The HTTP layer: error answers, request limits (body size, nesting, rates) and exact decimal
input, shared by the API's routes."""
