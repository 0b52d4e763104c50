"""The streamfit worker: reads labelled records from Kafka or a file, refits models, commits offsets.

``worker.loop.run(WorkerSettings)`` runs one worker process.
"""
