"""flamingo: bulk audio captioning with Audio Flamingo 3 / Music Flamingo through vLLM."""

__version__ = "0.1.0"
