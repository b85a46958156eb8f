"""The bridge's ``.proto`` files and the code generated from them at build time."""
