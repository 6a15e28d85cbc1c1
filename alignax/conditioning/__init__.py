"""Text conditioning of the MM-DiT: classifier-free guidance inputs (`guidance`), the encoded
negative prompt (`negative_prompt`) and SD3's text encoders in JAX (`text_encoders`)."""

from alignax.conditioning.guidance import Conditioning, conditioning
from alignax.conditioning.text_encoders import TextEncoders

__all__ = ["Conditioning", "TextEncoders", "conditioning"]
