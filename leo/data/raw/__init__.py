"""Raw few-shot image datasets: fetching with checksums, archives, decoding, and one reader
per dataset format. Each reader returns prepared splits (:mod:`leo.data.prepared`)."""
