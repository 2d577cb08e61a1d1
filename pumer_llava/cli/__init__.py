"""Command-line entry points, thin callers of the public API.

``pumer-chat`` (:mod:`pumer_llava.cli.chat`): a terminal chat with a LLaVA model
whose visual tokens are reduced, showing what the reduction buys.
"""
