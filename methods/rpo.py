"""RPO: read-only prompts that read CLIP's tokens and are never read by them.

"Read-only Prompt Optimization for Vision-Language Few-shot Learning" (ICCV 2023, arXiv
2308.14960).  Reproduces the official trainer (``trainers/rpo.py`` of the authors' RPO code
base, with its ``clip/model.py`` whose transformers take an attention mask per call):

* K learned pairs: ``text_prompt`` (K x text width) and ``img_prompt`` (K x image width).
* Text: each class's prompt "a photo of a <name>." (the class name as the dataset gives it:
  the official code does not turn "_" into spaces) is embedded, the positional embedding
  added, and the K text prompts written into the K positions right after the end-of-text
  token, *without* a positional embedding.  The attention mask of class c (EOT at position
  e): causal, and every key after e is masked.  So CLIP's own tokens (up to EOT) attend as
  in CLIP and never to a prompt, and each prompt attends to CLIP's tokens only (not to
  itself, nor to the other prompts).  The text feature of pair i is ``ln_final`` of the
  prompt position e + 1 + i, times the text projection.
* Image: the K image prompts are appended after the class and patch tokens once the
  positional embedding is added (they get none), go through ``ln_pre`` with them, and the
  mask hides the K prompt keys from every query: the same read-only rule.  The image
  feature of pair i is ``ln_post`` of the i-th prompt token times the projection.
* Logits: the mean over i of CLIP's logit scale times the cosine similarities of image
  feature i and text feature i, accumulated in fp32 (as officially, whatever the precision);
  training minimises their cross-entropy; the same mean is the prediction at test time (the
  ensemble over the K pairs).
* Initialisation: text prompts = the token embedding of end-of-text + 0.1 * a unit-norm
  Gaussian vector each; image prompts = CLIP's class embedding + 0.1 * a unit-norm Gaussian
  vector each (text noise drawn first), cast to CLIP's dtype.
* Precision: ``fp16`` (the official configs): CLIP and both prompts in half precision, SGD on
  the half tensors; ``fp32``/``amp`` with fp32 weights.

Where the official code hard-codes ViT-B/16 (8 text heads, 14 x 14 patches, widths 512 and
768) the backbone's own sizes are used; on ViT-B/16 they are the same.  The official
``CTX_INIT`` key is in its configs but never read.  One revision of the official trainer
builds the image mask for 1 + 14 * 14 tokens (the ``+ K`` commented out), which cannot run
with K appended prompts (``nn.MultiheadAttention`` rejects the mask's size); the runnable
revision's (1 + 196 + K)-square mask is used.

The learned module is ``prompt_learner`` (official keys ``text_prompt``, ``img_prompt``).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from benchmark.backbone import tokenize
from methods.registry import Method, MethodError, register_method

TEMPLATE = "a photo of a {}."  # DATASET.PROMPT of every official dataset config ("a photo of a _.")
NOISE_SCALE = 0.1  # the official initial offset from the end-of-text / class embedding


def rpo_template(dataset) -> str:
    """The prompt of the official dataset configs; the toy world keeps its caption form."""
    return dataset.template if dataset.world == "toy" else TEMPLATE


def text_mask(eot: torch.Tensor, length: int, heads: int) -> torch.Tensor:
    """The official per-class text mask, repeated per head (class-major): causal, and every key
    after the class's end-of-text token hidden.  ``eot``: position of EOT per class."""
    causal = torch.full((length, length), float("-inf"), device=eot.device).triu_(1)
    keys = torch.arange(length, device=eot.device)
    hidden = (keys.unsqueeze(0) > eot.unsqueeze(1)).unsqueeze(1)  # (classes, 1, keys)
    mask = causal.unsqueeze(0).masked_fill(hidden, float("-inf"))
    return mask.repeat_interleave(heads, dim=0)


def image_mask(tokens: int, k: int, device=None) -> torch.Tensor:
    """The official image mask: no query attends to the K prompt keys (the last K tokens)."""
    mask = torch.zeros(tokens + k, tokens + k, device=device)
    mask[:, tokens:] = float("-inf")
    return mask


class PromptLearner(nn.Module):
    """The K text and K image prompts, with the official parameter names."""

    def __init__(self, clip: nn.Module, k: int):
        super().__init__()
        if k < 1:
            raise MethodError(f"RPO's K (the number of prompt pairs) must be at least 1, not {k}.")
        self.K = k
        dtype = clip.visual.conv1.weight.dtype
        text_width = clip.ln_final.weight.shape[0]
        image_width = clip.visual.conv1.weight.shape[0]
        eot = int(tokenize([""])[0].max())  # the end-of-text id (49407)
        with torch.no_grad():
            weight = clip.token_embedding.weight
            text = weight[eot].float().repeat(k, 1)
            noise = torch.randn(k, text_width)
            text = text + NOISE_SCALE * (noise / noise.norm(dim=-1, keepdim=True)).to(text.device)
            image = clip.visual.class_embedding.detach().float().repeat(k, 1)
            noise = torch.randn(k, image_width)
            image = image + NOISE_SCALE * (noise / noise.norm(dim=-1, keepdim=True)).to(image.device)
        self.text_prompt = nn.Parameter(text.to(dtype))
        self.img_prompt = nn.Parameter(image.to(dtype))

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.text_prompt, self.img_prompt


@register_method(
    "rpo", node="RPO",
    defaults=dict(K=24, CTX_INIT="a photo of a", PREC="fp16"),
    paper="Read-only Prompt Optimization for Vision-Language Few-shot Learning (ICCV 2023)", paper_name="RPO",
    code="the authors' RPO repository (mlvlab/RPO), trainers/rpo.py and clip/model.py")
class RPO(Method):
    trainable = ("prompt_learner.",)
    official_module = "prompt_learner"

    def __init__(self, clip, classnames, cfg, dataset=None):
        super().__init__(clip, classnames, cfg, dataset)
        visual = clip.visual
        if not hasattr(visual, "class_embedding") or not hasattr(visual, "ln_pre"):
            raise MethodError("RPO needs a vision transformer backbone (its image prompts are tokens); "
                              f"got {type(visual).__name__}.")
        if getattr(visual, "attn_pool", None) is not None or not isinstance(getattr(visual, "patch_dropout", nn.Identity()), nn.Identity):
            raise MethodError("RPO appends its image prompts to the plain token sequence of CLIP's vision "
                              "transformer; this backbone pools or drops tokens otherwise.")
        for tower in (clip.transformer, visual.transformer):
            if not getattr(tower, "batch_first", True):
                raise MethodError("RPO expects open_clip transformers in batch-first layout (open_clip >= 2.24).")
        self.prompt_learner = PromptLearner(clip, int(self.options.K))
        self.register_buffer("text_x", torch.empty(0), persistent=False)  # class embeddings + positions
        self.register_buffer("tokens", torch.empty(0, dtype=torch.long), persistent=False)
        self.set_classnames(classnames)

    # -- class names -------------------------------------------------------------------------
    @property
    def template(self) -> str:
        return rpo_template(self.dataset)

    @torch.no_grad()
    def set_classnames(self, classnames: Sequence[str]) -> None:
        clip, k = self.clip, self.prompt_learner.K
        # official quirk: the class name goes in as given ("_" kept)
        tokens = tokenize([self.template.format(c) for c in classnames]).to(clip.token_embedding.weight.device)
        eot = tokens.argmax(dim=-1)
        context = clip.positional_embedding.shape[0]
        if int(eot.max()) + k >= context:
            long = classnames[int(eot.argmax())]
            raise MethodError(f"RPO places its {k} text prompts after the end-of-text token; the prompt for "
                              f"'{long}' leaves no room for them in {context} positions.")
        self.classnames = list(classnames)
        self.tokens = tokens
        self.text_x = clip.token_embedding(tokens).to(self.dtype) + clip.positional_embedding.to(self.dtype)

    # -- encoders ----------------------------------------------------------------------------
    def encode_text(self) -> torch.Tensor:
        """(classes, K, embed): the text features of the K prompts of every class."""
        clip, learner = self.clip, self.prompt_learner
        k, x, eot = learner.K, self.text_x, self.tokens.argmax(dim=-1)
        if self.fast("TRUNCATE_TEXT"):
            # keys after a class's EOT are masked and the mask is causal: later positions never
            # reach the ones read (EOT + 1 .. EOT + K)
            x = x[:, :self._prompt_length(self.tokens) + k]
        n, length = x.shape[:2]
        rows = torch.arange(n, device=x.device).repeat_interleave(k)
        cols = (eot.unsqueeze(1) + 1 + torch.arange(k, device=x.device)).flatten()
        x = x.index_put((rows, cols), learner.text_prompt.to(x.dtype).repeat(n, 1))
        mask = text_mask(eot, length, clip.transformer.resblocks[0].attn.num_heads)
        for block in clip.transformer.resblocks:
            x = block(x, attn_mask=mask)
        x = clip.ln_final(x).to(x.dtype)
        return x[rows, cols].view(n, k, -1) @ clip.text_projection

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        """(images, K, embed): the image features of the K prompts of every image."""
        visual, learner = self.clip.visual, self.prompt_learner
        k = learner.K
        x = visual.conv1(images.to(self.dtype))
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
        cls = visual.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + visual.positional_embedding.to(x.dtype)
        tokens = x.shape[1]
        x = torch.cat([x, learner.img_prompt.to(x.dtype).expand(x.shape[0], -1, -1)], dim=1)
        x = visual.ln_pre(x)
        mask = image_mask(tokens, k, x.device)
        for block in visual.transformer.resblocks:
            x = block(x, attn_mask=mask)
        return visual.ln_post(x[:, tokens:]) @ visual.proj

    # -- forward -------------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        text = self.prompt_features()
        image = self.encode_image(images)
        text = text / text.norm(dim=-1, keepdim=True)
        image = image / image.norm(dim=-1, keepdim=True)
        scale = self.clip.logit_scale.exp()
        k = self.prompt_learner.K
        # the official ensemble: pair i of the image with pair i of the text, summed into fp32
        logits = torch.zeros(image.shape[0], text.shape[0], device=image.device)
        for i in range(k):
            logits = logits + scale * image[:, i] @ text[:, i].t()
        return logits / k
