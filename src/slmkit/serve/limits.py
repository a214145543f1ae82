"""The server's request limits, in one place (the CLI's defaults and create_app read them)."""

MAX_TOKENS_LIMIT = 2048  # the most a request may ask for, and what it gets when it names no max_tokens
