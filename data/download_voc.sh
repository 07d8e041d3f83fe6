#!/usr/bin/env bash
# Download Pascal VOC 2012 with the SBD-augmented masks and lay it out as the VOC loader expects:
#
#   DATA_ROOT/PascalVOC2012/VOCdevkit/VOC2012/JPEGImages/*.jpg
#   DATA_ROOT/PascalVOC2012/SegmentationClassAug/*.png            (values 0..20 and 255)
#   DATA_ROOT/PascalVOC2012/SegmentationClassAug_Visualization/   (unused)
#   DATA_ROOT/PascalVOC2012/list/{train_aug,val,...}.txt
#
# Usage: bash data/download_voc.sh [DATA_ROOT]     (default: the current directory)
# Then:  python run.py --dataset voc --data_root DATA_ROOT ...
#
# (The *_URL variables may be set to use a mirror.)
# Safe to re-run: finished steps are skipped and interrupted downloads resume. About 2.9 GB of downloads.
set -euo pipefail

VOC_URL="${VOC_URL:-http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar}"
VOC_MD5="6cd6e144f989b92b3379bac3b3de84fd"
AUG_URL="${AUG_URL:-http://cs.jhu.edu/~cxliu/data}"

die() { echo "download_voc.sh: error: $*" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || die "'$1' is not installed; install it (e.g. apt-get install $1) and re-run."; }

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

md5_of() { if command -v md5sum >/dev/null 2>&1; then md5sum "$1" | cut -d' ' -f1; else md5 -q "$1"; fi; }
sha256_of() { if command -v sha256sum >/dev/null 2>&1; then sha256sum "$1" | cut -d' ' -f1; else shasum -a 256 "$1" | cut -d' ' -f1; fi; }

unpack_zip() {  # unpack_zip NAME DIR: download NAME.zip from the SBD mirror unless DIR is complete
    local name=$1 dir=$2
    if [ -f "$dir/.complete" ]; then echo "$dir already present, skipping."; return; fi
    [ -f "$name.zip" ] || fetch "$AUG_URL/$name.zip" "$name.zip"
    echo "$name.zip sha256 $(sha256_of "$name.zip") (no published checksum: not verified)"
    unzip -q -o "$name.zip" || die "$name.zip is corrupt or truncated; delete it and re-run."
    rm -rf __MACOSX
    [ -d "$dir" ] || die "$name.zip did not contain the folder $dir/."
    touch "$dir/.complete"
    rm -f "$name.zip"
}

need tar
need unzip
ROOT=${1:-.}
mkdir -p "$ROOT/PascalVOC2012"
cd "$ROOT/PascalVOC2012"
echo "Laying out Pascal VOC 2012 in $(pwd)"

if [ -f VOCdevkit/VOC2012/.complete ]; then
    echo "VOCdevkit/VOC2012 already present, skipping."
else
    tarball=VOCtrainval_11-May-2012.tar
    [ -f "$tarball" ] || fetch "$VOC_URL" "$tarball"
    echo "Checking the md5 of $tarball"
    got=$(md5_of "$tarball")
    if [ "$got" != "$VOC_MD5" ]; then
        rm -f "$tarball"
        die "$tarball has md5 $got, expected $VOC_MD5 (corrupt or truncated download, deleted); re-run."
    fi
    tar -xf "$tarball" || die "could not extract $tarball (disk full?); re-run."
    [ -d VOCdevkit/VOC2012/JPEGImages ] || die "$tarball did not contain VOCdevkit/VOC2012/JPEGImages."
    touch VOCdevkit/VOC2012/.complete
    rm -f "$tarball"
fi

unpack_zip SegmentationClassAug SegmentationClassAug
unpack_zip SegmentationClassAug_Visualization SegmentationClassAug_Visualization
unpack_zip list list

[ -f list/train_aug.txt ] && [ -f list/val.txt ] || die "list/ lacks train_aug.txt or val.txt."
echo "Done: $(pwd) holds VOCdevkit/, SegmentationClassAug/ ($(ls SegmentationClassAug | wc -l) masks) and list/."
echo "Use --data_root $(cd .. && pwd)"
