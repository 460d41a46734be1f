#!/usr/bin/env bash
# The DICOMweb tests run a real Orthanc with its DICOMweb plugin: install the Debian packages when missing.
set -euo pipefail
if { command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ]; } \
    && ls /usr/share/orthanc/plugins/libOrthancDicomWeb.so* /usr/lib/orthanc/libOrthancDicomWeb.so* >/dev/null 2>&1; then
  exit 0
fi
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
$SUDO apt-get update -q
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends orthanc orthanc-dicomweb
