"""Render retrieval items into Qwen2-VL token sequences and collate them into model batches.

An *item* is `{"text": str|None, "image": PIL.Image | uint8 HxWx3 array | None, "instruction": str|None}`.

U-MARVEL format (default): a chat rendered by the checkpoint's own chat template,
    system: <system_prompt>
    user:   [<|vision_start|><|image_pad|>*n<|vision_end|>] [<instruction_start>INSTR<instruction_end>]TEXT
            + "\\nSummarize above {image and sentence|sentence|image} in one word: "
    assistant: "<emb>."
MM-Embed format: "Instruct: INSTR\\nQuery: <image>\\nTEXT" for queries, "<image>\\nTEXT" for candidates.

The template, the instruction and the text are tokenized as separate pieces and concatenated, so
that (1) truncation cuts the text only, never the template or image tokens, and (2) the instruction
span is known exactly (it is excluded from pooling but still attends and is attended to). Item text
is tokenized with `split_special_tokens=True`, so a caption containing "<|image_pad|>" cannot forge
template or image tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from umarvel_ray.model.pixels import PATCHES_KEY, VALUES_KEY, PatchLayout

EMB_TOKEN = "<emb>"
INSTRUCTION_START = "<instruction_start>"
INSTRUCTION_END = "<instruction_end>"
ADDED_TOKENS: tuple[str, ...] = (EMB_TOKEN, INSTRUCTION_START, INSTRUCTION_END)
IMAGE_PAD = "<|image_pad|>"
VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"

COMPRESSION_SUFFIX = {
    "image_text": "\nSummarize above image and sentence in one word: ",
    "text": "\nSummarize above sentence in one word: ",
    "image": "\nSummarize above image in one word: ",
}
ASSISTANT_EMB = EMB_TOKEN + "."
FORMATS = ("umarvel", "mmembed")

# mm_token_type_ids values used by transformers 5.x (0 text, 1 image, 2 video)
TEXT_TYPE, IMAGE_TYPE = 0, 1

_INS = "\x00UMARVEL_INSTRUCTION\x00"
_TXT = "\x00UMARVEL_TEXT\x00"


@dataclass
class InputConfig:
    """How items become token sequences; shared by the embedder and the reranker."""

    format: str = field(default="umarvel", metadata={"help": "umarvel (chat + <emb>) or mmembed"})
    system_prompt: str = field(
        default="You are a helpful assistant.", metadata={"help": "system turn of the chat (umarvel)"}
    )
    compression_suffix: bool = field(
        default=True, metadata={"help": "append 'Summarize above ... in one word: ' (umarvel)"}
    )
    max_text_tokens: int = field(
        default=480, metadata={"help": "truncate an item's text to this many tokens (0 = no limit)"}
    )
    min_pixels: int = field(default=4 * 28 * 28, metadata={"help": "image pixel floor (resized up)"})
    max_pixels: int = field(default=300 * 28 * 28, metadata={"help": "image pixel budget (resized down)"})
    padding_side: str = field(default="right", metadata={"help": "right or left"})
    compact_pixels: bool = field(
        default=True,
        metadata={
            "help": "images travel as uint8 patches and become pixel_values on the model's device "
            "(Qwen2-VL processors; equal to the HF processor's output); false = the HF processor"
        },
    )

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"InputConfig.format must be one of {FORMATS}, got {self.format!r}")
        if self.padding_side not in ("left", "right"):
            raise ValueError(f"InputConfig.padding_side must be left or right, got {self.padding_side!r}")
        if self.min_pixels > self.max_pixels:
            raise ValueError("InputConfig.min_pixels must not exceed max_pixels")


def ensure_added_tokens(tokenizer: Any, model: Any = None, tokens: tuple[str, ...] = ADDED_TOKENS) -> int:
    """Add <emb>/<instruction_start>/<instruction_end> (when missing) and grow the embeddings to fit.

    New embedding rows are set deterministically (mean of the existing rows plus a small seeded
    offset per token) so that building twice, or base + adapter, gives identical weights.
    Returns the number of tokens added to the tokenizer.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    added = 0
    if missing:
        added = tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in missing], True)
    if model is not None:
        grow_embeddings(model, len(tokenizer))
    return added


def grow_embeddings(model: Any, n_tokens: int) -> None:
    """Resize input/output embeddings to `n_tokens` rows if smaller, with deterministic new rows."""
    import torch

    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if n_tokens <= old:
        return
    model.resize_token_embeddings(n_tokens, mean_resizing=False)
    with torch.no_grad():
        for layer in (model.get_input_embeddings(), model.get_output_embeddings()):
            if layer is None:
                continue
            w = layer.weight
            base = w[:old].float()
            mean, std = base.mean(0), base.std(0).mean()
            for row in range(old, n_tokens):
                gen = torch.Generator().manual_seed(1_000_003 + row)
                noise = torch.randn(w.shape[1], generator=gen) * 0.1 * std
                w[row] = (mean + noise).to(w.dtype)
            if getattr(layer, "bias", None) is not None:
                layer.bias[old:] = 0


@dataclass
class Rendered:
    """One item as token ids plus per-token flags, before padding."""

    input_ids: list[int]
    instruction: list[int]  # 1 on the instruction span (markers included)
    mm_type: list[int]  # 1 on image placeholder tokens
    grids: list[list[int]]  # (t, h, w) patches of each image, in sequence order
    text_tokens: int  # text tokens kept after truncation


def _to_rgb_array(image: Any) -> Any:
    """PIL image or uint8 array -> contiguous uint8 HxWx3 RGB array."""
    if hasattr(image, "convert"):  # PIL
        return np.asarray(image.convert("RGB"), dtype=np.uint8)
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"image arrays must be uint8 HxWx3, got dtype {arr.dtype}")
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    if arr.ndim != 3 or arr.shape[2] not in (3, 4):
        raise TypeError(f"image arrays must be HxWx3 (or HxWx4), got shape {arr.shape}")
    return np.ascontiguousarray(arr[:, :, :3])


def _clean(s: Any) -> str | None:
    if s is None:
        return None
    s = str(s)
    return s if s.strip() else None


class Collator:
    """Picklable batch builder: items -> dict of CPU tensors the Embedder/Reranker forward takes.

    Keys: input_ids, attention_mask, pool_mask, instruction_mask, mm_token_type_ids, position_ids
    (3, B, L; M-RoPE, pads 0, as the model's `get_rope_index` computes them), and, when any item
    has an image, pixel_values + image_grid_thw (images in batch order).
    """

    def __init__(
        self,
        tokenizer: Any,
        image_processor: Any,
        cfg: InputConfig | None = None,
        pool_instruction: bool = False,
        chat_template: str | None = None,
        require_markers: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.cfg = cfg or InputConfig()
        self.pool_instruction = pool_instruction
        self.chat_template = chat_template or getattr(tokenizer, "chat_template", None)
        if self.cfg.format == "umarvel" and not self.chat_template:
            raise ValueError("the umarvel input format needs a chat template on the tokenizer/processor")
        missing = [t for t in ADDED_TOKENS if t not in tokenizer.get_vocab()]
        if self.cfg.format == "umarvel" and require_markers and missing:
            raise ValueError(f"tokenizer lacks {missing}; call ensure_added_tokens(tokenizer, model) first")
        ids = tokenizer.convert_tokens_to_ids
        self.image_pad_id = ids(IMAGE_PAD)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ids("<|endoftext|>")
        self.merge_size = int(getattr(image_processor, "merge_size", 2))
        self.pixel_layout = PatchLayout.from_processor(image_processor)
        self._piece_cache: dict[str, list[int]] = {}
        self._template_cache: dict[tuple, list[str]] = {}

    # ----------------------------------------------------------------- tokenization helpers
    def _piece(self, s: str) -> list[int]:
        """Template text (special tokens recognised), memoised: the same few pieces recur."""
        ids = self._piece_cache.get(s)
        if ids is None:
            ids = self.tokenizer(s, add_special_tokens=False)["input_ids"]
            self._piece_cache[s] = ids
        return ids

    def _user_text(self, texts: list[str]) -> list[list[int]]:
        """Item text as plain text: special-token strings inside it are split, never honoured."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def _umarvel_template(self, has_image: bool, has_instr: bool, has_text: bool) -> list[str]:
        """The chat rendered by the checkpoint's template, split at the instruction/text slots."""
        key = (has_image, has_instr, has_text)
        pieces = self._template_cache.get(key)
        if pieces is not None:
            return pieces
        suffix = ""
        if self.cfg.compression_suffix:
            kind = "image_text" if has_image and has_text else ("image" if has_image else "text")
            suffix = COMPRESSION_SUFFIX[kind]
        user: list[dict[str, str]] = [{"type": "image"}] if has_image else []
        user.append({"type": "text", "text": (_INS if has_instr else "") + _TXT + suffix})
        messages = [
            {"role": "system", "content": self.cfg.system_prompt},
            {"role": "user", "content": user},
            {"role": "assistant", "content": [{"type": "text", "text": ASSISTANT_EMB}]},
        ]
        rendered = self.tokenizer.apply_chat_template(
            messages, chat_template=self.chat_template, tokenize=False, add_generation_prompt=False
        )
        if _TXT not in rendered:
            raise ValueError("chat template dropped the user text; cannot render U-MARVEL inputs")
        head, tail = rendered.split(_TXT)
        pieces = head.split(_INS) if has_instr else [head]
        pieces.append(tail)
        self._template_cache[key] = pieces
        return pieces

    def assemble(
        self, parts: list[tuple[list[int], int]], grids: list[list[int]], text_tokens: int
    ) -> Rendered:
        """Concatenate (ids, is-instruction) parts, expanding each <|image_pad|> slot, in order, to
        its image's merged-patch count (t*h*w / merge^2) as the processor does."""
        counts = iter(g[0] * g[1] * g[2] // self.merge_size**2 for g in grids)
        seq: list[int] = []
        ins: list[int] = []
        typ: list[int] = []
        for ids, flag in parts:
            for t in ids:
                if t == self.image_pad_id:
                    n = next(counts, None)
                    if n is None:
                        raise ValueError("the template has more image slots than the item has images")
                    seq += [t] * n
                    typ += [IMAGE_TYPE] * n
                    ins += [flag] * n
                else:
                    seq.append(t)
                    typ.append(TEXT_TYPE)
                    ins.append(flag)
        if next(counts, None) is not None:
            raise ValueError("the item has more images than the template has image slots")
        return Rendered(seq, ins, typ, [list(g) for g in grids], text_tokens)

    # ----------------------------------------------------------------- rendering
    def render(
        self,
        items: list[dict[str, Any]],
        is_query: bool,
        grids: list[list[int] | None],
    ) -> list[Rendered]:
        """Token sequences for items whose image grids are already known (None = no image)."""
        texts = [_clean(it.get("text")) for it in items]
        instrs = [_clean(it.get("instruction")) if is_query else None for it in items]
        limit = self.cfg.max_text_tokens
        text_ids = iter(self._user_text([t for t in texts if t is not None]))
        instr_ids = iter(self._user_text([s for s in instrs if s is not None]))
        out = []
        for i, _ in enumerate(items):
            grid = grids[i]
            if texts[i] is None and grid is None:
                raise ValueError(f"item {i} has neither text nor image")
            tids = next(text_ids) if texts[i] is not None else []
            if limit and len(tids) > limit:
                tids = tids[:limit]
            iids = next(instr_ids) if instrs[i] is not None else None
            parts: list[tuple[list[int], int]] = []  # (token ids, is-instruction)
            if self.cfg.format == "umarvel":
                pieces = self._umarvel_template(grid is not None, iids is not None, bool(tids))
                parts.append((self._piece(pieces[0]), 0))
                if iids is not None:
                    marked = self._piece(INSTRUCTION_START) + iids + self._piece(INSTRUCTION_END)
                    parts += [(marked, 1), (self._piece(pieces[1]), 0)]
                parts += [(tids, 0), (self._piece(pieces[-1]), 0)]
            else:  # mmembed
                if iids is not None:
                    parts.append((self._piece("Instruct: ") + iids + self._piece("\nQuery: "), 1))
                if grid is not None:
                    parts.append((self._piece(VISION_START + IMAGE_PAD + VISION_END), 0))
                    if tids:
                        parts.append((self._piece("\n"), 0))
                parts.append((tids, 0))
            out.append(self.assemble(parts, [grid] if grid is not None else [], len(tids)))
        return out

    def process_images(self, images: list[Any]) -> dict[str, Any]:
        """Images under the pixel budget -> image_grid_thw (n, 3) (long) plus either pixel_patches
        (uint8 (patches, C, P, P), see `pixels`) or the processor's pixel_values (patches, C*T*P*P)."""
        import torch

        arrays = [_to_rgb_array(im) for im in images]
        layout = self.pixel_layout
        if layout is None or not self.cfg.compact_pixels:
            out = self.image_processor(
                images=arrays,
                return_tensors="pt",
                input_data_format="channels_last",
                size={"shortest_edge": self.cfg.min_pixels, "longest_edge": self.cfg.max_pixels},
            )
            return {
                VALUES_KEY: out[VALUES_KEY],
                "image_grid_thw": torch.as_tensor(out["image_grid_thw"], dtype=torch.long),
            }
        patches, grids = [], []
        for arr in arrays:
            p, grid = layout.patchify(self._resized(arr, layout.factor))
            patches.append(p)
            grids.append(grid)
        return {
            PATCHES_KEY: torch.from_numpy(np.concatenate(patches)),
            "image_grid_thw": torch.tensor(grids, dtype=torch.long),
        }

    def _resized(self, arr: Any, factor: int) -> Any:
        """The image at its smart_resize size (PIL bicubic, as the HF processor resizes); decoded
        pipeline images already have it, so this is a no-op for them."""
        from PIL import Image

        from umarvel_ray.data.images import smart_resize

        h, w = arr.shape[:2]
        th, tw = smart_resize(
            h, w, factor=factor, min_pixels=self.cfg.min_pixels, max_pixels=self.cfg.max_pixels
        )
        if (th, tw) == (h, w):
            return arr
        resized = Image.fromarray(arr).resize((tw, th), Image.Resampling.BICUBIC)
        return np.asarray(resized, dtype=np.uint8)

    def __call__(self, items: list[dict[str, Any]], is_query: bool = False) -> dict[str, Any]:
        """Batch of items -> dict of CPU tensors; queries keep their instruction, candidates drop it."""
        if not items:
            raise ValueError("cannot collate an empty list of items")
        image_idx = [i for i, it in enumerate(items) if it.get("image") is not None]
        grids: list[list[int] | None] = [None] * len(items)
        vision: dict[str, Any] = {}
        if image_idx:
            vision = dict(self.process_images([items[i]["image"] for i in image_idx]))
            for k, i in enumerate(image_idx):
                grids[i] = [int(x) for x in vision["image_grid_thw"][k]]
        rendered = self.render(items, is_query, grids)
        batch = pad_rendered(rendered, self.pad_id, self.cfg.padding_side, self.merge_size)
        keep = batch["attention_mask"].bool()
        if not self.pool_instruction:
            keep &= ~batch["instruction_mask"].bool()
        batch["pool_mask"] = keep.long()
        batch.update(vision)
        return batch


def pad_rendered(rendered: list[Rendered], pad_id: int, side: str, merge_size: int) -> dict[str, Any]:
    """Pad to the longest sequence and compute M-RoPE position ids per item (pads get 0)."""
    import torch

    n, length = len(rendered), max(len(r.input_ids) for r in rendered)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention = torch.zeros((n, length), dtype=torch.long)
    instruction = torch.zeros((n, length), dtype=torch.long)
    mm_type = torch.zeros((n, length), dtype=torch.long)
    positions = torch.zeros((3, n, length), dtype=torch.long)
    for b, r in enumerate(rendered):
        m = len(r.input_ids)
        sl = slice(0, m) if side == "right" else slice(length - m, length)
        input_ids[b, sl] = torch.tensor(r.input_ids, dtype=torch.long)
        attention[b, sl] = 1
        instruction[b, sl] = torch.tensor(r.instruction, dtype=torch.long)
        mm_type[b, sl] = torch.tensor(r.mm_type, dtype=torch.long)
        positions[:, b, sl] = mrope_positions(r.mm_type, r.grids, merge_size)
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "instruction_mask": instruction,
        "mm_token_type_ids": mm_type,
        "position_ids": positions,
    }


def mrope_positions(mm_type: list[int], grids: list[list[int]], merge_size: int) -> Any:
    """(3, L) M-RoPE positions of one unpadded sequence, as `Qwen2VLModel.get_rope_index` computes:
    text runs count up on all three rows; an image block gets (t, h, w) grid positions offset by
    the current position, after which text resumes at offset + max(h, w)."""
    import torch

    grid_iter = iter(grids)
    chunks = []
    pos = 0
    start = 0
    n = len(mm_type)
    while start < n:
        end = start
        while end < n and mm_type[end] == mm_type[start]:
            end += 1
        if mm_type[start] == TEXT_TYPE:
            chunks.append(torch.arange(pos, pos + end - start).expand(3, -1))
            pos += end - start
        else:
            grid_thw = next(grid_iter, None)
            if grid_thw is None:
                raise ValueError("image tokens without an image grid")
            t, h, w = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
            if t * h * w != end - start:
                raise ValueError(f"image block of {end - start} tokens does not match grid {grid_thw}")
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
            chunks.append(torch.stack([tt, hh, ww]).reshape(3, -1) + pos)
            pos += max(h, w)
        start = end
    return torch.cat(chunks, dim=1) if chunks else torch.zeros((3, 0), dtype=torch.long)


def attention_bias(attention_mask: Any, causal: bool, dtype: Any) -> Any:
    """Explicit 4-D additive mask (B, 1, L, L): 0 where a query may attend, dtype-min elsewhere.

    Passed in EVERY batch (padded or not) so attention is never silently causal. A token may
    always attend to itself, so no row is fully masked (fully masked rows give NaNs in SDPA that
    would then leak into real tokens through 0 * NaN).
    """
    import torch

    b, length = attention_mask.shape
    allowed = attention_mask.bool()[:, None, None, :].expand(b, 1, length, length)
    if causal:
        tril = torch.ones(length, length, dtype=torch.bool, device=attention_mask.device).tril()
        allowed = allowed & tril
    eye = torch.eye(length, dtype=torch.bool, device=attention_mask.device)
    allowed = allowed | eye
    bias = torch.zeros((b, 1, length, length), dtype=dtype, device=attention_mask.device)
    return bias.masked_fill(~allowed, torch.finfo(dtype).min)
