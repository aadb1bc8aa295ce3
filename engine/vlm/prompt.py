"""A multimodal prompt's text: a prompt string with image placeholders, or a conversation rendered by
the folder's chat template, split at the placeholders and checked against the images given. Torch-
free, as is the processor that uses it (`mmfuse.vlm.processor`), which the ONNX runtime (`mmfuse.ort.vlm`) runs too."""
from __future__ import annotations

from ..encoders.preprocess import ImageProcessor
from ..errors import PromptError


def render_messages(template, messages: list, add_generation_prompt: bool = True) -> tuple:
    """(text, images given inside the messages' content parts) of a conversation."""
    if template is None:
        raise PromptError("the folder has no chat template (chat_template.json, chat_template.jinja or "
                          "tokenizer_config.json): pass a prompt string with image placeholders instead")
    found = []
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        for part in content if isinstance(content, list) else []:
            if isinstance(part, dict) and part.get("type") == "image":
                if part.get("url") is not None:
                    raise PromptError(f"image URLs are not fetched ({part['url']!r}): pass the image itself")
                found += [part[k] for k in ("image", "path") if part.get(k) is not None][:1]
    return template.render(messages, add_generation_prompt=add_generation_prompt), found


def split_prompt(prompt, images, template, image_token: str, add_generation_prompt: bool = True) -> tuple:
    """A prompt string (with image placeholders) or a conversation and its images (one, a list or None)
    -> (text pieces around the placeholders, the images, whether the tokenizer adds special tokens:
    not when the rendered conversation already starts with the BOS). The checks (prompt type, images
    given twice, placeholders vs images) happen here. Torch-free."""
    images = [] if images is None else ImageProcessor.as_list(images)
    if isinstance(prompt, str):
        text, special = prompt, True
    elif isinstance(prompt, list):
        text, found = render_messages(template, prompt, add_generation_prompt)
        if found and images:
            raise PromptError("images are given both inside the messages and as images=: give them one way")
        images = images or found
        bos = template.special_tokens.get("bos_token")
        special = not (bos and text.startswith(bos))
    else:
        raise PromptError(f"a prompt is a string or a list of messages, not {type(prompt).__name__}")
    parts = text.split(image_token)
    if len(parts) - 1 != len(images):
        raise PromptError(f"the prompt has {len(parts) - 1} image placeholder(s) {image_token!r} but "
                          f"{len(images)} image(s) were given")
    return parts, images, special
