# Makes conf/ importable as the package data `mansu.conf` (mansu/conf links here), so Hydra finds
# the configs of an installed mansu as pkg://mansu.conf.
