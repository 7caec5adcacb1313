"""TensorRT engine building: plugins, builder presets."""
