#!/usr/bin/env bash
# Orthanc and its DICOMweb plugin (Debian packages) for tests/test_dicomweb.py, which starts its own
# Orthanc on a free loopback port. Idempotent; refreshes the package lists only when they lack them.
# Called by .ci/run and, when Orthanc is missing, by the test itself (so the README's test command
# works on a fresh machine).
set -euo pipefail
if dpkg -s orthanc orthanc-dicomweb >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "not root: install orthanc and orthanc-dicomweb (apt-get) for tests/test_dicomweb.py" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-cache show orthanc orthanc-dicomweb >/dev/null 2>&1 || apt-get update -qq
apt-get install -y -qq orthanc orthanc-dicomweb >/dev/null
