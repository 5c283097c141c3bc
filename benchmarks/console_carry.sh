#!/usr/bin/env bash
# The browser console's GPU check (benchmarks/console_check.py) needs Chromium and Playwright's Python driver,
# which the GPU machine lacks and cannot download (~190 MB: more than one device call carries). `pack` (on
# the CPU machine, Debian 12) fetches them once and cuts them into parts of at most PART_MB (default 55) MiB;
# each part travels in its own device call on one warm machine, and that call copies it out of the tree
# (`mkdir -p /tmp/parts && cp .console/partNN /tmp/parts/`): a call's tree replaces the last one's, carried
# paths included, while /tmp stays as long as the machine is held. `install` (on the GPU machine, once every
# part is there) joins and unpacks them and prints the exports that console_check.py needs, and the libraries
# Chromium still lacks there (each a Debian package to add to LIBS and pack again).
#   bash benchmarks/console_carry.sh pack [.console]       # then: echo /.console/ >> .git/info/exclude
#   bash benchmarks/console_carry.sh install /tmp/parts    # on the GPU machine; eval its last line
set -euo pipefail
dir=${2:-.console}
# Chromium's dependencies that a CUDA container image is unlikely to hold (libc, libgcc, zlib and the other
# base-system ones are left out; the last two lines: what `install` found missing on the H200 machine, Ubuntu
# 24.04, and a font, without which the page's text is not drawn there).
LIBS="chromium chromium-common libasound2 libatk-bridge2.0-0 libatk1.0-0 libatspi2.0-0 libcairo2 libcups2
  libdav1d6 libdbus-1-3 libdouble-conversion3 libflac12 libfontconfig1 libfreetype6 libgbm1 libharfbuzz-subset0
  libharfbuzz0b libjpeg62-turbo liblcms2-2 libminizip1 libnspr4 libnss3 libopenh264-7 libopenjp2-7 libopus0
  libpango-1.0-0 libpulse0 libx11-6 libxcb1 libxcomposite1 libxdamage1 libxext6 libxfixes3 libxkbcommon0
  libxnvctrl0 libxrandr2 libdrm2 libwayland-server0 libxau6 libxdmcp6 libpixman-1-0 libpng16-16 libxrender1
  libxcb-render0 libxcb-shm0 libgraphite2-3 libfribidi0 libthai0 libdatrie1 libpangocairo-1.0-0
  libpangoft2-1.0-0 libavahi-client3 libavahi-common3 libgnutls30 libsndfile1 libasyncns0 libx11-xcb1
  libglib2.0-0 libunistring2 libxi6 libogg0 libvorbis0a libvorbisenc2 libmpg123-0 libmp3lame0
  fonts-dejavu-core"
# Playwright's Python driver for the GPU machine's CPython 3.12 (the versions of requirements/cpu-test.lock).
WHEELS="playwright==1.63.0 greenlet==3.5.6 pyee==13.0.1"
case "${1:-}" in
  pack)
    stage=$(mktemp -d)
    mkdir -p "$stage/debs" "$stage/wheels"
    (cd "$stage/debs" && apt-get download $LIBS >/dev/null)
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
      --platform manylinux1_x86_64 -d "$stage/wheels" $WHEELS
    rm -rf "$dir" && mkdir -p "$dir"
    tar -C "$stage" -cf - debs wheels | split -b "${PART_MB:-55}M" -d - "$dir/part"
    rm -rf "$stage"
    ls -l "$dir"
    ;;
  install)
    root=/tmp/console-root
    rm -rf "$root" && mkdir -p "$root/unpack" "$root/site"
    cat "$dir"/part* | tar -C "$root" -xf -
    for f in "$root"/debs/*.deb; do dpkg -x "$f" "$root/unpack"; done
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$root/site" "$root"/wheels/*.whl
    libs=$(find "$root/unpack" -name '*.so*' -printf '%h\n' | sort -u | tr '\n' ':')
    chrome="$root/unpack/usr/lib/chromium/chromium"
    echo "=== libraries Chromium still lacks here:"
    LD_LIBRARY_PATH=$libs ldd "$chrome" | grep "not found" || echo "none"
    # fontconfig reads this file alone: the unpacked fonts (the machine may have none).
    printf '<?xml version="1.0"?>\n<fontconfig><dir>%s</dir><cachedir>%s</cachedir></fontconfig>\n' \
      "$root/unpack/usr/share/fonts" "$root/fontcache" >"$root/fonts.conf"
    # The unpacked libraries reach Chromium alone, through a wrapper: the server that console_check starts
    # must keep the machine's own libraries.
    printf '#!/bin/sh\nexport LD_LIBRARY_PATH=%s${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} FONTCONFIG_FILE=%s\nexec %s "$@"\n' \
      "$libs" "$root/fonts.conf" "$chrome" >"$root/chromium"
    chmod +x "$root/chromium"
    echo "export MICROTURN_CHROMIUM=$root/chromium PYTHONPATH=$root/site\${PYTHONPATH:+:\$PYTHONPATH}"
    ;;
  *)
    echo "usage: $0 pack|install [DIR]" >&2
    exit 2
    ;;
esac
