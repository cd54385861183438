"""The sampling wing: everything that generates text from a model.

  sampler   KV-cache prefill/decode at fixed shapes, `generate`, the prompt-width rule, `left_pad`
  budget    s1 budget forcing inside the decode loop (thinking cap, "Wait" extensions, loop guard)
  batched   `generate_texts`: k samples for many prompts in fixed-shape batches, texts primer first
  stream    `Streamer`: row 0's text written out as it grows (the generate and chat CLIs)

Import the modules themselves (`from tpu_reason.sampling import sampler`); this package imports nothing
so that loading one of them stays light.
"""
