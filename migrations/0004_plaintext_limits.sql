-- keepd schema v4: the device-name limit applies to the name, not to its
-- stored form. With encryption at rest the column holds
-- `kf1:<version>:<base64>`, which is longer than the name it seals; the API
-- checks the name (1 to 200 characters) before sealing it. The database
-- keeps a bound for both forms: a plain name of 1 to 200 characters, or a
-- sealed one no longer than a sealed 200-character name can be.
ALTER TABLE keepd.devices DROP CONSTRAINT devices_device_name_check;
ALTER TABLE keepd.devices ADD CONSTRAINT devices_device_name_check CHECK (
    length(device_name) BETWEEN 1 AND 200
    OR (device_name LIKE 'kf1:%' AND length(device_name) <= 1200)
);
