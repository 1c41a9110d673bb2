"""The one table between the native protos and the core's domain values: requests are converted here once, at
the edge (the servicers, and the job runner reading its stored items), and answers go back through the same
tables; the core never holds a protobuf message.

  proto                                   domain
  --------------------------------------  ------------------------------------------------
  GenerateRequest                         serving/generation.py GenerationRequest
  GenerateResponse                        serving/generation.py Piece
  InferRequest                            serving/embedding.py EmbedRequest
  FinishReason FINISH_REASON_*            serving/generation.py FinishReason
  Pooling POOLING_*                       serving/embedding.py Pooling (UNSPECIFIED = MEAN)
"""

from __future__ import annotations

from coordinator.serving.constraints import GrammarKind, Structure
from coordinator.serving.embedding import EmbedRequest, Pooling
from coordinator.serving.generation import FinishReason, GenerationRequest, Logprob, Piece, Turn
from coordinator.serving.tools import Tool, ToolCall
from shardline.codec import decode_tensor
from shardline.errors import InvalidArgument
from shardline.v1 import coordinator_pb2

FINISH = {FinishReason.NONE: coordinator_pb2.FINISH_REASON_UNSPECIFIED,
          FinishReason.LENGTH: coordinator_pb2.FINISH_REASON_LENGTH,
          FinishReason.STOP: coordinator_pb2.FINISH_REASON_STOP,
          FinishReason.TOOL_CALLS: coordinator_pb2.FINISH_REASON_TOOL_CALLS}
POOLING = {coordinator_pb2.POOLING_UNSPECIFIED: Pooling.MEAN, coordinator_pb2.POOLING_MEAN: Pooling.MEAN,
           coordinator_pb2.POOLING_CLS: Pooling.CLS}


def generation_request(r: coordinator_pb2.GenerateRequest) -> GenerationRequest:
    return GenerationRequest(
        model=r.model, prompt=r.prompt,
        messages=tuple(Turn(m.role, m.content, tuple(ToolCall(c.id, c.name, c.arguments) for c in m.tool_calls),
                            m.tool_call_id) for m in r.messages),
        tools=tuple(Tool(t.name, t.description, t.parameters or "{}") for t in r.tools), tool_choice=r.tool_choice,
        n=r.n or 1,
        max_tokens=r.max_tokens if r.HasField("max_tokens") else None,
        temperature=r.temperature if r.HasField("temperature") else None, top_k=r.top_k,
        prompt_ids=tuple(r.prompt_token_ids),
        top_p=r.top_p if r.HasField("top_p") else None, seed=r.seed if r.HasField("seed") else None,
        stop=tuple(r.stop), min_tokens=r.min_tokens if r.HasField("min_tokens") else 0, ignore_eos=r.ignore_eos,
        resume_ids=tuple(r.resume_token_ids), stop_ids=tuple(r.stop_token_ids),
        logprobs=r.logprobs if r.HasField("logprobs") else None,
        prompt_logprobs=r.prompt_logprobs if r.HasField("prompt_logprobs") else None,
        logit_bias=tuple(sorted(r.logit_bias.items())),
        repetition_penalty=r.repetition_penalty if r.HasField("repetition_penalty") else None,
        frequency_penalty=r.frequency_penalty, presence_penalty=r.presence_penalty, min_p=r.min_p,
        structure=structure(r))


def structure(r: coordinator_pb2.GenerateRequest) -> Structure | None:
    """Structured output's one field, if any (two are refused, naming them)."""
    given = [Structure(kind, spec) for kind, spec, on in (
        (GrammarKind.JSON_SCHEMA, r.json_schema, bool(r.json_schema)), (GrammarKind.JSON_OBJECT, "", r.json_object),
        (GrammarKind.REGEX, r.regex, bool(r.regex)), (GrammarKind.GRAMMAR, r.grammar, bool(r.grammar))) if on]
    if len(given) > 1:
        raise InvalidArgument(f"send at most one of json_schema, json_object, regex and grammar, not "
                              f"{' and '.join(s.field for s in given)}")
    return given[0] if given else None


def token_logprob(t: Logprob) -> coordinator_pb2.TokenLogprob:
    return coordinator_pb2.TokenLogprob(
        token_id=t.token_id, token=t.token, logprob=t.logprob,
        top=[coordinator_pb2.TopLogprob(token_id=i, token=text, logprob=lp) for i, text, lp in t.top])


def generate_response(piece: Piece) -> coordinator_pb2.GenerateResponse:
    """One message of a Generate stream; the last carries the finish reason and the usage, the first the
    version serving it and its seed (what a resume sends back)."""
    response = coordinator_pb2.GenerateResponse(text=piece.text, token_ids=piece.token_ids,
                                                finish_reason=FINISH[piece.finish_reason], cached=piece.cached,
                                                model=piece.model, index=piece.index)
    if piece.seed is not None:
        response.seed = piece.seed
    if piece.logprobs:
        response.logprobs.extend(token_logprob(t) for t in piece.logprobs)
    if piece.tool_calls:
        response.tool_calls.extend(coordinator_pb2.ToolCall(id=c.id, name=c.name, arguments=c.arguments)
                                   for c in piece.tool_calls)
    if piece.prompt_logprobs:
        response.prompt_logprobs.extend(token_logprob(t) for t in piece.prompt_logprobs)
    if piece.model:  # the first message
        response.prompt_tokens = piece.prompt_tokens
    if piece.finish_reason:
        response.usage.prompt_tokens = piece.prompt_tokens
        response.usage.completion_tokens = piece.completion_tokens
    return response


def embed_request(r: coordinator_pb2.InferRequest) -> EmbedRequest:
    """The core's request; a malformed tensor or an unknown pooling is refused here, naming the field."""
    has_ids = r.HasField("input_ids")
    if r.texts and has_ids:
        raise InvalidArgument("send either texts or input_ids, not both")
    pooling = POOLING.get(r.pooling)
    if pooling is None:
        raise InvalidArgument(f"pooling {r.pooling} is not a known Pooling")
    return EmbedRequest(
        model=r.model, texts=tuple(r.texts), input_ids=decode_tensor(r.input_ids, "input_ids") if has_ids else None,
        attention_mask=decode_tensor(r.attention_mask, "attention_mask") if r.HasField("attention_mask") else None,
        pooling=pooling, normalize=r.normalize if r.HasField("normalize") else True, truncate=r.truncate)
