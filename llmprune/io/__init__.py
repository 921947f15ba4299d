"""Everything that touches files or the network: model loading, built-in assets, text data,
safetensors shards, activation files, the resume journal, publishing outputs, the Hub."""
