"""DICOM in, DICOM out: reading Part 10 objects and their pixels, the derived (processed) instance, and
de-identification by DICOM PS3.15 Annex E (the basic profile with the Clean Pixel Data option).

Only `sniff` is safe to import in the web process; everything else imports pydicom and runs in the workers.
"""
