"""
The value syntaxes of the configuration file.
"""

from twisted.trial.unittest import SynchronousTestCase

from l7lb import units


class UnitTests(SynchronousTestCase):
    def test_durations(self):
        self.assertEqual(units.parse_duration("250ms"), 0.25)
        self.assertEqual(units.parse_duration(" 10s "), 10.0)
        self.assertEqual(units.parse_duration("2m"), 120.0)
        self.assertEqual(units.parse_duration("1.5h"), 5400.0)
        self.assertEqual(units.parse_duration("2d"), 172800.0)
        self.assertEqual(units.parse_duration("1w"), 604800.0)
        self.assertEqual(units.parse_duration("1y"), 31536000.0)
        for bad in ("10", "s", "-1s", "1 s", "1M", ""):
            self.assertRaises(ValueError, units.parse_duration, bad)

    def test_sizes(self):
        self.assertEqual(units.parse_size("512"), 512)
        self.assertEqual(units.parse_size("512B"), 512)
        self.assertEqual(units.parse_size("16KiB"), 16384)
        self.assertEqual(units.parse_size("10MiB"), 10 * 1024 * 1024)
        self.assertEqual(units.parse_size("1GiB"), 1 << 30)
        for bad in ("1.5KiB", "16kb", "MiB", "-1"):
            self.assertRaises(ValueError, units.parse_size, bad)

    def test_rates(self):
        self.assertEqual(units.parse_rate("100/s"), 100.0)
        self.assertEqual(units.parse_rate("6000/m"), 100.0)
        self.assertEqual(units.parse_rate("36/h"), 0.01)
        for bad in ("100", "0/s", "10/d", "x/s"):
            self.assertRaises(ValueError, units.parse_rate, bad)

    def test_booleans(self):
        for word in ("on", "YES", "true"):
            self.assertTrue(units.parse_bool(word))
        for word in ("off", "No", "FALSE"):
            self.assertFalse(units.parse_bool(word))
        self.assertRaises(ValueError, units.parse_bool, "1")

    def test_ints_and_lists(self):
        self.assertEqual(units.parse_int("7", 1, 10), 7)
        self.assertRaises(ValueError, units.parse_int, "0", 1, 10)
        self.assertRaises(ValueError, units.parse_int, "11", 1, 10)
        self.assertRaises(ValueError, units.parse_int, "-3", 0)
        self.assertEqual(units.parse_list("a b\n  c"), ["a", "b", "c"])

    def test_format_duration(self):
        self.assertEqual(units.format_duration(0.25), "250ms")
        self.assertEqual(units.format_duration(10), "10s")
        self.assertEqual(units.format_duration(120), "2m")
