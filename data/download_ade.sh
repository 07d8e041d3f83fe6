#!/usr/bin/env bash
# Download ADE20k SceneParsing (ADEChallengeData2016) and unpack it as the ADE loader expects:
#
#   DATA_ROOT/ADEChallengeData2016/images/{training,validation}/*.jpg       (20,210 + 2,000)
#   DATA_ROOT/ADEChallengeData2016/annotations/{training,validation}/*.png  (values 0..150)
#   DATA_ROOT/ADEChallengeData2016/{objectInfo150.txt,sceneCategories.txt}
#
# Usage: bash data/download_ade.sh [DATA_ROOT]     (default: the current directory)
# Then:  python run.py --dataset ade --data_root DATA_ROOT ...
#
# (The *_URL variables may be set to use a mirror.)
# Safe to re-run: a finished unpack is skipped and an interrupted download resumes. About 0.9 GB.
set -euo pipefail

ADE_URL="${ADE_URL:-http://data.csail.mit.edu/places/ADEchallenge/ADEChallengeData2016.zip}"

die() { echo "download_ade.sh: error: $*" >&2; exit 1; }
command -v unzip >/dev/null 2>&1 || die "'unzip' is not installed; install it (e.g. apt-get install unzip) and re-run."

fetch() {  # fetch URL FILE: resumable download into FILE
    local url=$1 out=$2
    echo "Downloading $url"
    if command -v wget >/dev/null 2>&1; then
        wget -c --tries=3 -O "$out.part" "$url" || die "download of $url failed; check the network and re-run (the download resumes)."
    elif command -v curl >/dev/null 2>&1; then
        curl -fL --retry 3 -C - -o "$out.part" "$url" || die "download of $url failed; check the network and re-run (the download resumes)."
    else
        die "neither wget nor curl is installed; install one of them and re-run."
    fi
    mv "$out.part" "$out"
}

sha256_of() { if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi; }

ROOT=${1:-.}
mkdir -p "$ROOT"
cd "$ROOT"
echo "Laying out ADE20k in $(pwd)"

if [ -f ADEChallengeData2016/.complete ]; then
    echo "ADEChallengeData2016 already present, nothing to do."
    exit 0
fi
zipfile=ADEChallengeData2016.zip
[ -f "$zipfile" ] || fetch "$ADE_URL" "$zipfile"
echo "$zipfile sha256 $(sha256_of "$zipfile") (no published checksum: not verified)"
unzip -q -o "$zipfile" || die "$zipfile is corrupt or truncated; delete it and re-run."
rm -rf __MACOSX
for d in images/training images/validation annotations/training annotations/validation; do
    [ -d "ADEChallengeData2016/$d" ] || die "$zipfile did not contain ADEChallengeData2016/$d."
done
touch ADEChallengeData2016/.complete
rm -f "$zipfile"
echo "Done: $(pwd)/ADEChallengeData2016 ($(ls ADEChallengeData2016/images/training | wc -l) training images)."
echo "Use --data_root $(pwd)"
