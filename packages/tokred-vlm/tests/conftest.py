"""An independent reference for reduced VLM runs, written without any of tokred.vlm's hooks.

It rebuilds, one row at a time, what an attached model should compute: the model's own embeddings and visual
features, the reducer called directly on each group (groups written out by hand from the row's images and
videos), the shortened sequence with its positions, and then the *unmodified* model run on ``inputs_embeds``
with a plain greedy loop over its cache. Tests compare attached ``model(**inputs)`` and ``model.generate``
logits against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from tokred.vlm.testing import IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, Image, Video, tiny_model, tiny_processor


def item_groups(family: str, model, item, *, multi_image: bool = False) -> list[int]:
    """Group label of each placeholder token of one image or video, by hand; -1 marks structural tokens.

    Anyres images must have a size equal to one of the tiny models' grid pinpoints (28x56, 56x28, 56x56), so
    no unpadding or interpolation happens and crops tile the grid regularly.
    """
    vision = model.config.vision_config
    if family in ("qwen2_vl", "qwen2_5_vl"):
        patch, merge = vision.patch_size, vision.spatial_merge_size
        h, w = item.height // patch, item.width // patch
        per_frame = h * w // merge**2
        frames = 1 if isinstance(item, Image) else item.frames // vision.temporal_patch_size
        return [f for f in range(frames) for _ in range(per_frame)]
    grid = vision.image_size // vision.patch_size
    if isinstance(item, Video):
        if family == "video_llava":
            return [g for f in range(item.frames) for g in [-1] + [f] * grid**2]
        per_frame = math.ceil(grid / 2) ** 2  # llava_onevision
        return [f for f in range(item.frames) for _ in range(per_frame)] + [-1]
    if family in ("llava", "video_llava"):
        return [0] * grid**2
    size = vision.image_size
    if multi_image:  # LLaVA-OneVision does not tile the images of a multi-image row: base crop + newline
        return [0] * grid**2 + [-1]
    assert (item.height, item.width) in [(28, 56), (56, 28), (56, 56)], "oracle needs a pinpoint-sized image"
    rows, cols = item.height // size, item.width // size
    groups = [0] * grid**2
    for r in range(rows * grid):
        groups += [1 + (r // grid) * cols + c // grid for c in range(cols * grid)] + [-1]
    return groups


@dataclass
class ReferenceRun:
    """What the unmodified model computes on the hand-reduced sequence."""

    prefill_logits: torch.Tensor  # (B, L', V)
    step_logits: list[torch.Tensor]  # each (B, V)
    tokens: torch.Tensor  # (B, steps)
    lengths: list[int]  # reduced length of each row
    embeds: torch.Tensor  # (B, L', C) the hand-reduced, left-padded prefill
    mask: torch.Tensor  # (B, L')
    positions: torch.Tensor  # (B, L') or (3, B, L')
    groups: torch.Tensor  # (B, L') a group id per visual token, -1 structural, -2 text and padding


def _full_embeddings(model, inputs):
    embeds = model.get_input_embeddings()(inputs["input_ids"])
    base = model.model
    for modality, token_id in (("image", IMAGE_TOKEN_ID), ("video", VIDEO_TOKEN_ID)):
        key = "pixel_values" if modality == "image" else "pixel_values_videos"
        if inputs.get(key) is None:
            continue
        function = getattr(base, f"get_{modality}_features")
        import inspect

        names = inspect.signature(function).parameters
        call = {k: v for k, v in inputs.items() if k in names}
        pooled = function(**call, return_dict=True).pooler_output
        features = torch.cat([p.reshape(-1, p.shape[-1]) for p in pooled])
        mask = inputs["input_ids"] == token_id
        embeds = embeds.clone()
        embeds[mask] = features.to(embeds.dtype)
    return embeds


def _vision_space(model, family, inputs, reducer):
    """``space="vision"`` by hand for LLaVA and Video-LLaVA: reduce each image or frame of the vision tower's
    selected features, project, and return the embeddings with a keep flag per placeholder token."""
    base, config = model.model, model.config
    embeds = model.get_input_embeddings()(inputs["input_ids"]).clone()
    keep = torch.zeros(inputs["input_ids"].shape, dtype=torch.bool)
    towers = [("image", IMAGE_TOKEN_ID, "pixel_values")]
    if family == "video_llava":
        towers.append(("video", VIDEO_TOKEN_ID, "pixel_values_videos"))
    for modality, token_id, key in towers:
        pixels = inputs.get(key)
        if pixels is None:
            continue
        tower = base.vision_tower if family == "llava" else getattr(base, f"{modality}_tower")
        if modality == "video":
            pixels = pixels.flatten(0, 1)  # one row per frame
        hidden = tower(pixels, output_hidden_states=True).hidden_states[config.vision_feature_layer]
        if modality == "image":
            hidden = hidden[:, 1:]  # the "default" strategy drops the class token of images
        structural = 1 if modality == "video" else 0  # video frames keep their class token, unreduced
        rows, row_keep = [], []
        for features in hidden:
            reduction = reducer(features[structural:].unsqueeze(0))
            merged = features.clone()
            flags = torch.zeros(len(features), dtype=torch.bool)
            flags[:structural] = True
            for slot, index in enumerate(reduction.indices[0].tolist()):
                merged[structural + index] = reduction.tokens[0, slot]
                flags[structural + index] = True
            rows.append(base.multi_modal_projector(merged.unsqueeze(0))[0])
            row_keep.append(flags)
        mask = inputs["input_ids"] == token_id
        embeds[mask] = torch.cat(rows).to(embeds.dtype)
        keep[mask] = torch.cat(row_keep)
    return embeds, keep


def _original_positions(model, family, inputs, mode):
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if family in ("qwen2_vl", "qwen2_5_vl"):
        positions, _ = model.model.get_rope_index(
            ids,
            inputs["mm_token_type_ids"],
            inputs.get("image_grid_thw"),
            inputs.get("video_grid_thw"),
            attention_mask=mask,
        )
        return positions  # (3, B, L)
    if mode == "forward":  # a plain call: the decoder numbers every column, padding included
        return torch.arange(ids.shape[1]).expand(ids.shape)
    return (mask.long().cumsum(-1) - 1).clamp_min(0)  # generate


def reference_run(model, family, inputs, rows, reducer, *, positions="original", mode="generate", steps=4, space="llm"):
    """Reduce each row by hand and run the unmodified ``model`` on the result (see the module docstring).

    Args:
        model: The model, with nothing attached.
        family: Its family name.
        inputs: What tokred.vlm.testing.tiny_inputs built (left padded).
        rows: The row specs given to tiny_inputs.
        reducer: The reducer (llm space).
        positions: "original" or "compact" (one-row positions only).
        mode: "generate" (positions as generate numbers them) or "forward" (plain call).
        steps: Greedy decode steps after the prefill.
        space: "llm", or "vision" (LLaVA and Video-LLaVA only).
    """
    with torch.no_grad():
        if space == "vision":
            embeds, vision_keep = _vision_space(model, family, inputs, reducer)
        else:
            embeds = _full_embeddings(model, inputs)
        original = _original_positions(model, family, inputs, mode)
        ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
        multi = family == "llava_onevision"
        new_rows = []
        for b, row in enumerate(rows):
            items = [x for x in row if not isinstance(x, int)]
            labels = []
            many_images = sum(isinstance(x, Image) for x in items) > 1
            for index, item in enumerate(items):
                labels += [
                    (index, g) if g >= 0 else None
                    for g in item_groups(family, model, item, multi_image=multi and many_images)
                ]
            visual = (ids[b] == IMAGE_TOKEN_ID) | (ids[b] == VIDEO_TOKEN_ID)
            columns = torch.nonzero(mask[b]).squeeze(1).tolist()
            visual_columns = [c for c in columns if visual[c]]
            assert len(visual_columns) == len(labels), (len(visual_columns), len(labels))
            row_embeds = embeds[b].clone()
            keep = {c: not visual[c] or (space == "vision" and bool(vision_keep[b, c])) for c in columns}
            for label in dict.fromkeys(lb for lb in labels if lb is not None and space == "llm"):
                members = [c for c, lb in zip(visual_columns, labels, strict=True) if lb == label]
                reduction = reducer(row_embeds[members].unsqueeze(0))
                for slot, index in enumerate(reduction.indices[0].tolist()):
                    keep[members[index]] = True
                    row_embeds[members[index]] = reduction.tokens[0, slot]
            for c, lb in zip(visual_columns, labels, strict=True):
                if lb is None:
                    keep[c] = True
            kept = [c for c in columns if keep[c]]
            label_of = dict(zip(visual_columns, labels, strict=True))
            ids_of = {lb: i for i, lb in enumerate(dict.fromkeys(lb for lb in labels if lb is not None))}
            row_groups = [
                -2 if c not in label_of else (-1 if label_of[c] is None else 1000 * b + ids_of[label_of[c]])
                for c in kept
            ]
            pos = original[..., b, kept] if original.dim() == 3 else original[b, kept]
            if positions == "compact":
                assert original.dim() == 2, "the reference compacts one-row positions only"
                pos = original[b, columns[0]] + torch.arange(len(kept))
            new_rows.append((row_embeds[kept], pos, torch.tensor(row_groups, dtype=torch.long)))
        length = max(len(e) for e, _, _ in new_rows)
        batch = len(new_rows)
        width = embeds.shape[-1]
        new_embeds = torch.zeros(batch, length, width, dtype=embeds.dtype)
        new_mask = torch.zeros(batch, length, dtype=torch.long)
        three = original.dim() == 3
        new_pos = torch.zeros((3, batch, length) if three else (batch, length), dtype=torch.long)
        new_groups = torch.full((batch, length), -2, dtype=torch.long)
        for b, (e, p, g) in enumerate(new_rows):
            new_embeds[b, length - len(e) :] = e
            new_mask[b, length - len(e) :] = 1
            new_pos[..., b, length - len(e) :] = p
            new_groups[b, length - len(e) :] = g
        prefill = (new_embeds, new_mask.clone(), new_pos, new_groups)
        out = model(inputs_embeds=new_embeds, attention_mask=new_mask, position_ids=new_pos, use_cache=True)
        prefill_logits = out.logits
        cache = out.cache
        step_logits, tokens = [], []
        last = new_pos[..., -1:]
        logits = prefill_logits[:, -1]
        for step in range(steps):
            step_logits.append(logits)
            token = logits.argmax(-1)
            tokens.append(token)
            new_mask = torch.cat([new_mask, torch.ones(batch, 1, dtype=torch.long)], dim=1)
            pos = last + 1 + step
            out = model(
                inputs_embeds=model.get_input_embeddings()(token[:, None]),
                attention_mask=new_mask,
                position_ids=pos,
                cache=cache,
                use_cache=True,
            )
            cache = out.cache
            logits = out.logits[:, -1]
        lengths = [len(e) for e, _, _ in new_rows]
        stacked = torch.stack(tokens, 1) if tokens else torch.zeros(batch, 0, dtype=torch.long)
        return ReferenceRun(prefill_logits, step_logits, stacked, lengths, *prefill)


@dataclass
class InnerStageRun:
    """What the hand-written two-stage pass computes."""

    prefill_logits: torch.Tensor  # (B, Ls, V) in the last stage's coordinates
    prefill_mask: torch.Tensor  # (B, Ls) bool, real tokens of the last stage
    step_logits: list[torch.Tensor]  # each (B, V)
    tokens: torch.Tensor  # (B, steps)
    layer_lengths: list[int]  # padded length each layer ran on at the prefill


def inner_stage_reference(model, family, inputs, rows, reducer, stages, *, positions="original", steps=6):
    """The first stage by hand (``reference_run``), then the whole decoder by hand with the inner stages.

    No hooks, no cache: every step runs all layers on the whole sequence (prompt and the tokens generated so
    far) with a hand-built causal mask over the real tokens, RoPE recomputed from the kept tokens' positions,
    and each inner stage's reducer called on each group's hidden states, one row and one group at a time.
    """
    first = reference_run(model, family, inputs, rows, reducer, positions=positions, mode="generate", steps=0)
    embed = model.get_input_embeddings()
    batch = first.embeds.shape[0]
    step_logits, tokens = [], []
    with torch.no_grad():
        for step in range(steps + 1):
            generated = len(tokens)
            hidden, mask, pos, groups = first.embeds, first.mask.bool(), first.positions, first.groups
            if generated:
                hidden = torch.cat([hidden, embed(torch.stack(tokens, 1))], dim=1)
                mask = torch.cat([mask, torch.ones(batch, generated, dtype=torch.bool)], dim=1)
                pos = torch.cat([pos, pos[..., -1:] + 1 + torch.arange(generated)], dim=-1)
                groups = torch.cat([groups, torch.full((batch, generated), -2, dtype=torch.long)], dim=1)
            logits, final_mask, lengths = _decoder_by_hand(model, hidden, mask, pos, groups, stages, positions)
            if step == 0:
                prefill = (logits, final_mask, lengths)
            step_logits.append(logits[:, -1])
            tokens.append(logits[:, -1].argmax(-1))
    return InnerStageRun(prefill[0], prefill[1], step_logits[:steps], torch.stack(tokens[:steps], 1), prefill[2])


def _decoder_by_hand(model, hidden, mask, pos, groups, stages, positions):
    decoder = model.get_decoder()
    lengths = []
    for index, layer in enumerate(decoder.layers):
        if index in stages:
            hidden, mask, pos, groups = _stage_by_hand(hidden, mask, pos, groups, stages[index], positions)
        length = hidden.shape[1]
        lengths.append(length)
        causal = torch.ones(length, length, dtype=torch.bool).tril()
        allowed = causal[None] & mask[:, None, :]  # (B, query, key)
        additive = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
        out = layer(hidden, attention_mask=additive[:, None], position_embeddings=decoder.rotary_emb(hidden, pos))
        hidden = out[0] if isinstance(out, tuple) else out
    return model.lm_head(decoder.norm(hidden)), mask, lengths


def _stage_by_hand(hidden, mask, pos, groups, reducer, positions):
    rows = []
    for b in range(hidden.shape[0]):
        row = hidden[b].clone()
        keep = mask[b].clone()
        for group in [int(g) for g in torch.unique(groups[b][mask[b]]) if g >= 0]:
            members = torch.nonzero((groups[b] == group) & mask[b]).squeeze(1)
            reduction = reducer(row[members].unsqueeze(0))
            keep[members] = False
            kept = members[reduction.indices[0]]
            keep[kept] = True
            row[kept] = reduction.tokens[0].to(row.dtype)
        columns = torch.nonzero(keep).squeeze(1)
        row_pos = pos[..., b, columns]
        if positions == "compact":
            row_pos = pos[b, torch.nonzero(mask[b])[0, 0]] + torch.arange(len(columns))
        rows.append((row[columns], row_pos, groups[b, columns]))
    length = max(len(r[0]) for r in rows)
    batch = len(rows)
    new_hidden = torch.zeros(batch, length, hidden.shape[-1], dtype=hidden.dtype)
    new_mask = torch.zeros(batch, length, dtype=torch.bool)
    new_pos = torch.zeros((*pos.shape[:-2], batch, length), dtype=pos.dtype)
    new_groups = torch.full((batch, length), -2, dtype=torch.long)
    for b, (h, p, g) in enumerate(rows):
        new_hidden[b, length - len(h) :] = h
        new_mask[b, length - len(h) :] = True
        new_pos[..., b, length - len(h) :] = p
        new_groups[b, length - len(h) :] = g
    return new_hidden, new_mask, new_pos, new_groups


@pytest.fixture
def inner_reference():
    """The hand-written two-stage reference, as a fixture."""
    return inner_stage_reference


@pytest.fixture
def reference():
    """The independent reference, as a fixture so test modules need no import path."""
    return reference_run


@pytest.fixture
def hand_groups():
    """The reference's hand-written group labels of one image or video (see item_groups)."""
    return item_groups


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder per family holding the tiny model and its processor, as `save_pretrained` writes them."""
    folders = {}

    def get(family):
        if family not in folders:
            folder = tmp_path_factory.mktemp(family)
            tiny_model(family).save_pretrained(folder)
            tiny_processor(family).save_pretrained(folder)
            folders[family] = folder
        return folders[family]

    return get
