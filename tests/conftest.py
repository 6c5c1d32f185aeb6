from memcontrol import offline

offline.apply()  # offline and quiet for every test, before any library import
