"""POST /tokenize and /detokenize (vLLM's extra endpoints), sharing the chat template path with chat."""

from __future__ import annotations

from joule.server.errors import bad_request
from joule.server.protocol import DetokenizeRequest, TokenizeRequest
from joule.server.responses import DetokenizeResponse, TokenizeResponse
from joule.server.serving_chat import render_chat_prompt
from joule.server.serving_common import ServingContext


def tokenize(context: ServingContext, body: TokenizeRequest) -> TokenizeResponse:
    context.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt or messages", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages is empty", param="messages")
        tokens = render_chat_prompt(context, body.messages, body.add_generation_prompt)
    else:
        tokens = context.require_tokenizer().encode(body.prompt, add_special_tokens=body.add_special_tokens)
    return TokenizeResponse(count=len(tokens), max_model_len=context.max_model_len, tokens=tokens)


def detokenize(context: ServingContext, body: DetokenizeRequest) -> DetokenizeResponse:
    context.check_model(body.model)
    for token_id in body.tokens:
        if not 0 <= token_id < context.vocab_size:
            raise bad_request(
                f"tokens contains token id {token_id}, outside the vocabulary [0, {context.vocab_size})", param="tokens"
            )
    return DetokenizeResponse(prompt=context.require_tokenizer().decode(body.tokens))
