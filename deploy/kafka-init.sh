#!/usr/bin/env bash
# Create the records topic and its dead-letter topic, once, in the
# apache/kafka image (which ships kafka-topics.sh). The topic's partition
# count bounds how many workers of one consumer group do work at once.
# Creating an existing topic is a no-op, so the job may run again.
set -euo pipefail

bootstrap=${KAFKA_BOOTSTRAP:-kafka:9092}
topic=${STREAMFIT_TOPIC:-flights}
partitions=${STREAMFIT_PARTITIONS:-6}
dead_letters=${STREAMFIT_DEAD_LETTER_TOPIC:-$topic-dead-letters}
topics=/opt/kafka/bin/kafka-topics.sh

"$topics" --bootstrap-server "$bootstrap" --create --if-not-exists \
  --topic "$topic" --partitions "$partitions" --replication-factor 1
"$topics" --bootstrap-server "$bootstrap" --create --if-not-exists \
  --topic "$dead_letters" --partitions 1 --replication-factor 1
"$topics" --bootstrap-server "$bootstrap" --describe --topic "$topic"
