"""Reading raw frames: files and pixels (`reader`, `amplifiers`, `bayer`), header normalisation
(`header`, `wcs`, `cards`), session grouping (`frames`), 2SPOT session files (`twospot`)."""
