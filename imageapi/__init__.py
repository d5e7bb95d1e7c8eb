"""imageapi: attach, mount and boot system images on stateless Linux nodes over the Image API v1."""

__version__ = "0.1.0"
