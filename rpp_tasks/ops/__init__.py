"""Running the product: the session watcher, the rpp command line and rpp up."""
