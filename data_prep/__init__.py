"""data_prep: convert instance-mask data sets (COCO json, InstaGAN folders, label maps, a synthetic set) into the
sharded Parquet layout that training streams through Ray Data. Run `python -m data_prep --help`."""
