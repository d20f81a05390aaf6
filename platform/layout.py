"""Token layout of the joint video-action sequence and THE block-causal mask predicate.

Training sequence (teacher forcing), K chunks:

    [first frame | clean chunks 0..K-2 | noisy chunks 0..K-1 | actions 0..K-1 | states 0..K-1]

The clean copy of the last chunk is left out: no token may attend to it (noisy/action chunk i see clean
chunks < i), so it would only cost compute. A sequence is a tuple of spans; every token of a span shares
(kind, chunk), and `attends` depends only on those, so the mask is defined once here and evaluated on
Python ints (accounting), on per-token tensors (dense / flex masks) and on spans (block-sparse layouts).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from functools import cached_property


class TokenKind(IntEnum):
    FIRST = 0  # clean first frame (latent frame 0)
    CLEAN = 1  # clean (observed) latent frames of a chunk
    NOISY = 2  # noisy latent frames of a chunk, to be denoised
    ACTION = 3  # noisy action tokens of a chunk, to be denoised
    STATE = 4  # one proprioceptive state token per chunk


def attends(q_kind, q_chunk, k_kind, k_chunk):
    """True where a query token may attend to a key token.

    Works elementwise on ints/bools, on broadcastable integer tensors, and inside Triton kernels, which
    compile this very function (only ==, <, <=, &, | and literal constants).
      - first frame  -> first frame
      - clean chunk i -> first frame, clean chunks <= i
      - noisy chunk i, action chunk i -> first frame, clean chunks < i, noisy i, action i, state i
      - state i      -> state i
    Any other kind (padding, -1) attends to nothing and is attended to by nothing.
    """
    FIRST, CLEAN, NOISY, ACTION, STATE = 0, 1, 2, 3, 4  # TokenKind's values, as literals Triton can compile
    k_first = k_kind == FIRST
    k_clean = k_kind == CLEAN
    same_chunk = q_chunk == k_chunk
    k_same_chunk_prediction = ((k_kind == NOISY) | (k_kind == ACTION) | (k_kind == STATE)) & same_chunk
    q_predicts = (q_kind == NOISY) | (q_kind == ACTION)
    return (
        ((q_kind == FIRST) & k_first)
        | ((q_kind == CLEAN) & (k_first | (k_clean & (k_chunk <= q_chunk))))
        | (q_predicts & (k_first | (k_clean & (k_chunk < q_chunk)) | k_same_chunk_prediction))
        | ((q_kind == STATE) & (k_kind == STATE) & same_chunk)
    )


@dataclass(frozen=True)
class Span:
    """A run of tokens sharing kind and chunk.

    Video spans cover `frames` latent frames starting at latent frame `frame_start` (temporal RoPE
    position); action spans start at 1D position `chunk * actions_per_chunk`; a state span sits at `chunk`.
    """

    kind: TokenKind
    chunk: int
    length: int
    frame_start: int = 0
    frames: int = 0


@dataclass(frozen=True)
class TokenLayout:
    spans: tuple[Span, ...]
    tokens_per_frame: int
    actions_per_chunk: int

    @cached_property
    def offsets(self) -> tuple[int, ...]:
        out, pos = [], 0
        for span in self.spans:
            out.append(pos)
            pos += span.length
        return tuple(out)

    @property
    def length(self) -> int:
        return sum(s.length for s in self.spans)

    def slice(self, kind: TokenKind) -> slice:
        """Token range of the spans of `kind`, which the constructors keep contiguous."""
        idx = [i for i, s in enumerate(self.spans) if s.kind == kind]
        if not idx or idx != list(range(idx[0], idx[-1] + 1)):
            raise ValueError(f"layout has no contiguous {kind.name} tokens")
        return slice(self.offsets[idx[0]], self.offsets[idx[-1]] + self.spans[idx[-1]].length)

    def count(self, *kinds: TokenKind) -> int:
        return sum(s.length for s in self.spans if s.kind in kinds)

    def __add__(self, other: TokenLayout) -> TokenLayout:
        if (self.tokens_per_frame, self.actions_per_chunk) != (other.tokens_per_frame, other.actions_per_chunk):
            raise ValueError("cannot concatenate layouts with different token geometry")
        return TokenLayout(self.spans + other.spans, self.tokens_per_frame, self.actions_per_chunk)

    # -- constructors -------------------------------------------------------------------------------

    @staticmethod
    def _video(kind: TokenKind, chunk: int, frame_start: int, frames: int, tokens_per_frame: int) -> Span:
        return Span(kind, chunk, frames * tokens_per_frame, frame_start=frame_start, frames=frames)

    @classmethod
    def first_frame(cls, tokens_per_frame: int, actions_per_chunk: int) -> TokenLayout:
        return cls((cls._video(TokenKind.FIRST, -1, 0, 1, tokens_per_frame),), tokens_per_frame, actions_per_chunk)

    @classmethod
    def clean_chunk(cls, chunk: int, frames_per_chunk: int, tokens_per_frame: int,
                    actions_per_chunk: int) -> TokenLayout:
        span = cls._video(TokenKind.CLEAN, chunk, 1 + chunk * frames_per_chunk, frames_per_chunk, tokens_per_frame)
        return cls((span,), tokens_per_frame, actions_per_chunk)

    @classmethod
    def prediction(cls, chunks: range, frames_per_chunk: int, tokens_per_frame: int,
                   actions_per_chunk: int) -> TokenLayout:
        """Noisy video, action and state tokens of `chunks`, in the sequence's order."""
        spans = [cls._video(TokenKind.NOISY, c, 1 + c * frames_per_chunk, frames_per_chunk, tokens_per_frame)
                 for c in chunks]
        spans += [Span(TokenKind.ACTION, c, actions_per_chunk) for c in chunks]
        spans += [Span(TokenKind.STATE, c, 1) for c in chunks]
        return cls(tuple(spans), tokens_per_frame, actions_per_chunk)

    @classmethod
    def video_clip(cls, frames: int, tokens_per_frame: int) -> TokenLayout:
        """Wan2.1's full-attention clip: `frames` latent frames from position 0 as one noisy span, in which
        every token attends to every token (noisy chunk 0 -> noisy chunk 0); no action or state tokens."""
        return cls((cls._video(TokenKind.NOISY, 0, 0, frames, tokens_per_frame),), tokens_per_frame, 0)

    @classmethod
    def teacher_forcing(cls, num_chunks: int, frames_per_chunk: int, tokens_per_frame: int,
                        actions_per_chunk: int) -> TokenLayout:
        layout = cls.first_frame(tokens_per_frame, actions_per_chunk)
        for c in range(num_chunks - 1):
            layout = layout + cls.clean_chunk(c, frames_per_chunk, tokens_per_frame, actions_per_chunk)
        return layout + cls.prediction(range(num_chunks), frames_per_chunk, tokens_per_frame, actions_per_chunk)

    # -- derived quantities -------------------------------------------------------------------------

    def span_allowed(self, keys: TokenLayout) -> list[list[bool]]:
        """attends() evaluated once per (query span, key span)."""
        return [[bool(attends(int(q.kind), q.chunk, int(k.kind), k.chunk)) for k in keys.spans] for q in self.spans]

    def allowed_pairs(self, keys: TokenLayout | None = None) -> int:
        """Number of (query, key) token pairs the mask allows: the attention work that is actually needed."""
        keys = keys or self
        allowed = self.span_allowed(keys)
        return sum(q.length * k.length for i, q in enumerate(self.spans)
                   for j, k in enumerate(keys.spans) if allowed[i][j])
