"""Builds that run lesson code over the course's materials.

- ``course_model``: the tokenizer and the small Llama pretrained on the world's corpus, measured
  with lesson 00's probes (``make course-model``, about 7 minutes on 2 cores).
"""
