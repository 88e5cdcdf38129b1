"""zip_janitor.py SOURCE.py OUT.zip — the janitor Lambda's zip, byte-for-byte the same for the same
source (fixed timestamp and mode), so a release's artifacts depend only on its source."""

import sys
import zipfile

source, out = sys.argv[1:3]
info = zipfile.ZipInfo("janitor.py", date_time=(1980, 1, 1, 0, 0, 0))
info.external_attr = 0o644 << 16
info.compress_type = zipfile.ZIP_DEFLATED
with open(source, "rb") as f, zipfile.ZipFile(out, "w") as archive:
    archive.writestr(info, f.read())
