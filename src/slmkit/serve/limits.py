"""The server's request limits, in one place (the CLI's defaults and create_app read them)."""

MAX_TOKENS_LIMIT = 2048  # the most a request may ask for, and what it gets when it names no max_tokens
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused with 413 before it is read whole
MAX_EMBEDDING_INPUTS = 64  # texts per /v1/embeddings request
MAX_EMBEDDING_TOKENS = 16384  # their tokens together
MAX_CHOICES = 16  # prompts x n per /v1/completions request: one request never fills the queue alone
MAX_STOP = 16  # stop strings per request (OpenAI takes 4)
MAX_CLASSIFY_INPUTS = 64  # texts per /v1/classify request
MAX_LABELS = 256  # labels a /v1/classify request may name
MAX_KEPT_RESPONSES = 256  # /v1/responses kept in memory for previous_response_id and retrieval
