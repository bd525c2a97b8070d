"""Model cards (rendering, apart from publishing), their plots, and keeping tokens out of what is shown."""

from .publish import PublishError, publish, publish_folder

__all__ = ["PublishError", "publish", "publish_folder"]
