"""Text on screen as it is generated: the `on_chunk` callback the generate and chat CLIs hand the sampler."""

from __future__ import annotations


class Streamer:
  """A sampler `on_chunk` callback writing row 0's new text to `out` as it grows."""

  def __init__(self, tokenizer, out):
    self.tokenizer, self.out, self.printed = tokenizer, out, 0

  def __call__(self, tokens_BxN, lengths_B):
    text = self.tokenizer.decode(tokens_BxN[0, : lengths_B[0]], skip_special_tokens=True)
    if len(text) > self.printed and not text.endswith("\ufffd"):  # wait for whole UTF-8 characters
      self.write(text)

  def write(self, text: str):
    """Write what of `text` is not on screen yet."""
    self.out.write(text[self.printed:])
    self.out.flush()
    self.printed = max(self.printed, len(text))
