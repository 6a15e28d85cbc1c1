"""Text conditioning of the MM-DiT: classifier-free guidance inputs (`guidance`) and the encoded
negative prompt (`negative_prompt`)."""

from alignax.conditioning.guidance import Conditioning, conditioning

__all__ = ["Conditioning", "conditioning"]
