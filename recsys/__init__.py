"""The recommender's core, which the offline jobs and the service both stand on: the bundle and its
manifest, request-time feature code, ranker scoring, the state stores and the engine. No HTTP, no
command line, no training loop."""
