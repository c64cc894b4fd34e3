#!/usr/bin/env bash
# Installs the Kafka clients tests/kafka.rs drives: Debian's kcat
# (librdkafka) and, in the virtual environment .venv-kafka/, kafka-python
# and confluent-kafka (which ships its own librdkafka) from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
apt_install() {
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" > /dev/null
}
command -v kcat > /dev/null || apt_install kcat
if ! .venv-kafka/bin/python -c 'import kafka, confluent_kafka' 2> /dev/null; then
  rm -rf .venv-kafka
  python3 -m venv .venv-kafka 2> /dev/null || { apt_install python3-venv; python3 -m venv .venv-kafka; }
  .venv-kafka/bin/python -m pip install -q --disable-pip-version-check 'kafka-python>=2.0.2' 'confluent-kafka>=2.3'
fi
kcat -V | head -1
.venv-kafka/bin/python -c 'import kafka, confluent_kafka; print("kafka-python", kafka.__version__, "confluent-kafka", confluent_kafka.__version__, "librdkafka", confluent_kafka.libversion()[0])'
